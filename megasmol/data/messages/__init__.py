"""Message lists, below ``data/chat`` and ``data/preference``: reading records and checking their
message lists (:mod:`records`), rendering them with a chat template and finding the assistant
text (:mod:`template`), and the chat tokenizer (:mod:`special_tokens`)."""
