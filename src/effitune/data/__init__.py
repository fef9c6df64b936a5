"""Data stages: scan (check every file) -> audit (what is in it) -> split -> cache -> DataModule.

Import from the modules (`effitune.data.scan`, `effitune.data.audit`, ...); the public functions are
re-exported at the top level as `effitune.scan`, `effitune.audit`.
"""
