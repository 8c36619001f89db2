"""The durable orchestration model: pure, no I/O, no asyncio."""
