"""reldl"""
