"""Run configurations (ml_collections get_config files)."""
