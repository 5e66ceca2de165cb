"""The pure domain: readings and their bounds, events, stream state.

Nothing in this package performs I/O: no asyncio, sockets, database or framework imports.
Time always comes in as an argument. ``tests/test_core_purity.py`` enforces it.
"""
