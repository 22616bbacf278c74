"""What every layer shares and that imports nothing of the project: the config contract (`common.config`:
every key, its type, default and valid range, and the loader)."""
