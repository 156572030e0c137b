"""What the tests share, one home per helper: tests/conftest.py holds the fixtures and
takes its helpers from here, and so do the test modules. A helper only one test module
uses stays in that module."""
