"""The commands at the door: flags, each command's job side, and the Submitit pipeline."""
