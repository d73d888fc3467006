"""What several layers share: whole-or-nothing output folders, JSONL reading, host array copies,
progress lines, and the allocator settings the commands (never the library) apply.
"""
