"""The REST history API v1 (SPEC section 6): DRF views over marketdata.selectors."""
