"""Ranks and faults: process groups, heartbeats between ranks, pre-emption and injected faults, DeepSpeed configs."""
