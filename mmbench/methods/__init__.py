"""Balancing methods: one module per method, each registering one `Method` subclass.

`mmbench.methods.base.METHODS` imports every module here on first use.
"""
