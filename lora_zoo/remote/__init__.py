"""Where zoos live besides this disk: one source parser and HfApi factory (``sources``), pulling
into the commit-keyed cache with every hash checked (``pull``), publishing (``push``)."""
