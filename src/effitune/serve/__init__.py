"""effitune.serve"""
