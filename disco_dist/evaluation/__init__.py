"""STS scoring of a student (and of a teacher side), seven tasks."""
