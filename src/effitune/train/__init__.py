"""effitune.train"""
