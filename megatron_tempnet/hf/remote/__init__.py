"""The model code a TempNet export ships (hf/remote_code.py); the package imports it too."""
