"""Long-context tools: the passkey retrieval eval (RoPE ABF and YaRN live in the spec/config)."""
