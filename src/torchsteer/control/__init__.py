"""Controllers as plain objects, usable in any training loop. Never imports Lightning."""
