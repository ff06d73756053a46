"""Storage and formats: fsspec URLs, retries, archives, images, pools and shards."""
