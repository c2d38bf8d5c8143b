"""Where a job's actors run: joining or starting Ray (`connect`), and placement as data (`placement`)."""
