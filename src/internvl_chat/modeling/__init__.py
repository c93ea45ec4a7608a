"""The Hub unit: flat files copied into every saved checkpoint (see modeling_internvl_chat.py)."""
