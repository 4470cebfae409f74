"""Learning on LoRAs with a zoo: the probe and the demo (reference LoL models and ``bench`` land here)."""
