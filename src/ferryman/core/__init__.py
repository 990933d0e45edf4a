"""Domain core: ids, models, errors and the clock. Imports no I/O package."""
