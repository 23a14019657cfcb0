"""`annotate`'s sources: AU tool CSVs (OpenFace, py-feat, LibreFace), a user's AU model, captioners."""
