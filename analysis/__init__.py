"""Analysis: the paper's tables and figures from tracked runs."""
