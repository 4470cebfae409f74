"""The on-disk format of a zoo: schema, manifest (+ path safety), writer, reader, named splits,
the minimal card. Knows nothing about remotes, training or tensors views."""
