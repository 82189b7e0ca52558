"""asv benchmark suites for hpcfl (see asv.conf.json at the repository root)."""
