"""The ZO methods, one module per family; each is a `zo.core.ZOOptimizer` subclass that the registry lists."""
