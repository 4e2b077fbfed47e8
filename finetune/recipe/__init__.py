"""Recipes: the typed dataclasses that are the single source of truth for a run's configuration
(schema.py), read from YAML with dotted overrides (typed_yaml.py, loading.py), checked key by key and
combination by combination before any model loads (library_keys.py, validation.py), with secrets refused
(secrets.py); the accelerate file a recipe launches under (launch_file.py); the resolved copy written next
to every output (resolved.py).

May import: finetune.errors, finetune.files.
"""
