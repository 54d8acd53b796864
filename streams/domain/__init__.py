"""What an order is: identifiers, the order model and documents (canonical, X12 850), CMS, certificate profile, products.

No I/O beyond reading files; everything above builds on it."""
