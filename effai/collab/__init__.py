"""Collaborative (split) inference between user devices and an edge server (MAHPPO, issue 19): the split export
(`effai split`), the multi-device environment, and its measurements. docs/split.md.
"""
