"""effitune.export"""
