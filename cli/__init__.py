"""Thin click commands; the work lives in alignkd_cache."""
