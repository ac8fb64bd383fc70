"""The shared kernel of Corvex: the generated `corvex.v1` wire types, money, the rate card and
its published forms (pricing page, drift gate), configuration loading, logging, request ids
and ready files. Every other package may import it; it imports none of them."""
