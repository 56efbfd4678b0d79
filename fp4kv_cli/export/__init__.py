"""Export calibrated KV scales in the layout and convention each engine loads, and inspect them.

``exporter`` writes (ModelOpt / compressed-tensors folders, JSON sidecar), ``inspect`` reads;
``conventions`` holds what each engine does with a loaded scale, with the sources it was read in.
"""
