"""Training: fitting value models (`value`); later baseline alignment and CTRL. Never imported by inference."""
