"""The fast inference paths, apart from the reference model they must equal."""
