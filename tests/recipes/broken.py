"""Test recipe that raises while loading, to check that the user sees the recipe's own traceback."""


def helper():
    return {}["missing-key"]


config = helper()
