"""Masked documents: token documents with an aligned loss mask, the layer below ``data/chat``
(conversations) and ``data/preference`` (pairs), which build on it and never on each other.

* :mod:`layout` -- the files of a prefix (tokens, ``_lossmask``, tokenizer, stats);
* :mod:`descriptions` -- the ``.chat.json`` / ``.pref.json`` that say what a prefix holds;
* :mod:`overflow` -- ``--on-overflow``: what happens to a document over ``--max-length``;
* :mod:`publish` -- writing a prefix: ``.partial`` names, renamed into place when whole;
* :mod:`summary` -- what ``prepare-chat`` / ``prepare-preferences`` record and print;
* :mod:`reader` -- opening a prefix's tokens and mask;
* :mod:`units`, :mod:`packing`, :mod:`dataset` -- packing units (conversations, pairs) into
  training sequences, the Megatron-Core dataset that serves them.
"""
