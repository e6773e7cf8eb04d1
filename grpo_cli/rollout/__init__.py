"""Rollouts: sampling G completions per prompt, the lean decoder, decoding with the code tool."""
