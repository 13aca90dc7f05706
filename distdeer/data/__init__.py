"""Trajectories of dynamical systems: generators and storage."""
