"""Code run inside the OLMo-core environment (see child.py); never imported by olmo-inject."""
