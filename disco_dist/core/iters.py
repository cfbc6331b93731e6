"""Small iteration helpers the streaming code shares."""


def chunks(items, size: int):
    """Lists of `size` consecutive items (the last one shorter), without holding more than one list."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
