"""Where a build's chunks are trained: in this process (``local``) or on a Ray cluster
(``ray``). A backend returns ``train(chunk, attempt) -> list[TrainedLora]``; the runner owns
the work dir, retries and packing, so a backend never writes a zoo."""
