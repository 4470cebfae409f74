"""The LoL-facing side: open any source as a ``Zoo`` (``source.load_zoo``), decode weights from
Arrow buffers, the GL(r) symmetry math and views, collate, torch datasets."""
