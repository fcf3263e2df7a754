"""App-ready bundles: one folder per model with every artifact, labels, preprocessing, a model card, performance
tables and a signed index (effai bundle pack / verify / unpack / install). Imports without torch, except `pack`."""
