"""Other doors into a zoo: ingest PEFT / diffusers / kohya files (local or from the Hub) with a
metadata table, merge zoos; and out of one: export, diff."""
