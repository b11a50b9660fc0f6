"""The options of the pipelines, in groups: each group defines its options and checks their values
(groups.py), a few rules span groups (rules.py), and a pipeline's command line is parsed, refused or
explained from the groups it takes (command_line.py)."""
