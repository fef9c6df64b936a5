"""effitune.evaluate"""
