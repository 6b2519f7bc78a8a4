"""Talking to a trained model: chat sessions with its template, and the chat commands."""
