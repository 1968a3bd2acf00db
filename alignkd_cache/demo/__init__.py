"""`alignkd-demo`: a miniature of the paper's claim on real scanned digits, end to end."""
