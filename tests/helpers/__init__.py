"""Shared helpers of the test suite: independent references, tiny nets, AT script pieces."""
