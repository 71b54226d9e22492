"""The LLM360 release of a run: one self-describing, checksummed bundle (bundle.py), its model card
(card.py), and the check a stranger runs on it (verify.py: checksums, formats, a re-run slice)."""
