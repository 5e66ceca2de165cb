// The app's shared context: {api, live, ward, user, navigate}. Screens call useCtx().
import { createContext, useContext } from './lib.js';

export const Ctx = createContext(null);
export const useCtx = () => useContext(Ctx);
export function navigate(path) { location.hash = path; }
